//! The error of a benchmark run.

/// Errors of a benchmark run (fabric, socket or harness failures).
pub type BenchError = Box<dyn std::error::Error + Send + Sync>;

/// Result of a benchmark step.
pub type BenchResult<T> = Result<T, BenchError>;
