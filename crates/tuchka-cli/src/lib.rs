//! tuchka-cli
