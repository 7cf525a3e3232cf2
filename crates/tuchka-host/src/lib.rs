//! tuchka-host
