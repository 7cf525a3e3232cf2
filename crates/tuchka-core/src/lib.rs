//! tuchka-core
