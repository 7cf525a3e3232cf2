//! tuchka-store
