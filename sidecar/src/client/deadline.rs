//! Deadlines a client gives (`REQUEST`, `CALL`), checked.

use std::time::Duration;

use crate::errors::OpError;
use crate::wire::ErrorCode;

/// Longest deadline a request may ask for (an hour).
pub const MAX_DEADLINE_MS: u32 = 3_600_000;

/// Checks a deadline in milliseconds (1 … an hour).
pub fn deadline(ms: u32) -> Result<Duration, OpError> {
    if ms == 0 || ms > MAX_DEADLINE_MS {
        return Err(OpError::new(
            ErrorCode::InvalidArgument,
            format!("deadline_ms {ms} is not in 1..={MAX_DEADLINE_MS}"),
        ));
    }
    Ok(Duration::from_millis(u64::from(ms)))
}
