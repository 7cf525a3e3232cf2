//! tuchka-client
