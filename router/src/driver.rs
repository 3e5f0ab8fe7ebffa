//! The tokio driver (to come).
