//! tuchka-controller
