//! tuchka-agent
