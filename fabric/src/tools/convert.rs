//! Conversions between [`ToolError`] and the crate's [`Error`], so that `?` takes a tool call's
//! error into a function that returns [`crate::Result`], and a fabric or I/O error into one that
//! returns [`super::Result`].
//!
//! Imports: `client.rs` ([`ToolError`]); the crate's `Error` and `ToolFailure`. Nothing imports
//! this file: it only implements `From`.

use super::client::ToolError;
use crate::error::{Error, ToolFailure};

/// A tool call's error as the fabric's: the session or fabric error it carries
/// ([`ToolError::PeerGone`], [`ToolError::Fabric`]) as it is, a deadline or a cancellation as
/// [`Error::DeadlineExceeded`] or [`Error::Cancelled`], and the tool's own failure as
/// [`Error::Tool`]. Converting back ([`ToolError::from`]) gives the same `ToolError`.
impl From<ToolError> for Error {
    fn from(e: ToolError) -> Self {
        match e {
            ToolError::DeadlineExceeded => Error::DeadlineExceeded,
            ToolError::Cancelled => Error::Cancelled,
            ToolError::Failed(r) => Error::Tool(ToolFailure::Failed(r)),
            ToolError::UnknownTool(t) => Error::Tool(ToolFailure::UnknownTool(t)),
            ToolError::Refused(r) => Error::Tool(ToolFailure::Refused(r)),
            ToolError::PeerGone(e) | ToolError::Fabric(e) => e,
        }
    }
}

/// The tool's failure, as the variant of [`ToolError`] of the same name.
impl From<ToolFailure> for ToolError {
    fn from(f: ToolFailure) -> Self {
        match f {
            ToolFailure::Failed(r) => ToolError::Failed(r),
            ToolFailure::UnknownTool(t) => ToolError::UnknownTool(t),
            ToolFailure::Refused(r) => ToolError::Refused(r),
        }
    }
}

/// An I/O error (a transport's set-up: certificates, sockets) as [`ToolError::Fabric`] holding
/// [`Error::Transport`], with its kind and message.
impl From<std::io::Error> for ToolError {
    fn from(e: std::io::Error) -> Self {
        ToolError::Fabric(Error::from(e))
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::time::Duration;

    use super::*;

    #[test]
    fn tool_errors_convert_to_the_fabric_error_and_back() {
        let cases = [
            (ToolError::DeadlineExceeded, Error::DeadlineExceeded),
            (ToolError::Cancelled, Error::Cancelled),
            (
                ToolError::Failed("disk full".into()),
                Error::Tool(ToolFailure::Failed("disk full".into())),
            ),
            (
                ToolError::UnknownTool("nope".into()),
                Error::Tool(ToolFailure::UnknownTool("nope".into())),
            ),
            (
                ToolError::Refused("overloaded".into()),
                Error::Tool(ToolFailure::Refused("overloaded".into())),
            ),
            (ToolError::PeerGone(Error::Closed), Error::Closed),
            (
                ToolError::PeerGone(Error::PeerDead {
                    silent_for: Duration::from_secs(1),
                }),
                Error::PeerDead {
                    silent_for: Duration::from_secs(1),
                },
            ),
            (
                ToolError::Fabric(Error::Config("x".into())),
                Error::Config("x".into()),
            ),
        ];
        for (tool, fabric) in cases {
            assert_eq!(Error::from(tool.clone()), fabric, "{tool:?}");
            assert_eq!(ToolError::from(fabric), tool, "back from {tool:?}");
        }
    }

    #[test]
    fn a_tool_failure_reads_the_same_as_the_fabric_error() {
        for tool in [
            ToolError::Failed("disk full".into()),
            ToolError::UnknownTool("nope".into()),
            ToolError::Refused("overloaded".into()),
        ] {
            assert_eq!(Error::from(tool.clone()).to_string(), tool.to_string());
        }
        assert_eq!(
            Error::from(ToolError::UnknownTool("nope".into())).to_string(),
            "unknown tool \"nope\""
        );
    }

    #[test]
    fn io_errors_keep_their_kind_and_message() {
        let io = || io::Error::new(io::ErrorKind::NotFound, "ca.pem: no such file");
        let want = Error::Transport {
            kind: io::ErrorKind::NotFound,
            message: "ca.pem: no such file".into(),
        };
        assert_eq!(Error::from(io()), want);
        assert_eq!(ToolError::from(io()), ToolError::Fabric(want));
        assert_eq!(
            Error::from(io()).to_string(),
            "transport error (NotFound): ca.pem: no such file"
        );
    }

    #[test]
    fn question_mark_crosses_the_error_types() {
        fn tool() -> super::super::Result<()> {
            Err(ToolError::UnknownTool("nope".into()))
        }
        fn fabric() -> crate::Result<()> {
            Err(Error::Closed)
        }
        fn setup() -> io::Result<()> {
            Err(io::Error::other("no certificate"))
        }
        fn in_fabric(which: u8) -> crate::Result<()> {
            match which {
                0 => tool()?,
                1 => fabric()?,
                _ => setup()?,
            }
            Ok(())
        }
        fn in_tools(which: u8) -> super::super::Result<()> {
            match which {
                0 => tool()?,
                1 => fabric()?,
                _ => setup()?,
            }
            Ok(())
        }
        assert!(matches!(in_fabric(0), Err(Error::Tool(_))));
        assert_eq!(in_fabric(1), Err(Error::Closed));
        assert!(matches!(in_fabric(2), Err(Error::Transport { .. })));
        assert_eq!(in_tools(0), Err(ToolError::UnknownTool("nope".into())));
        assert_eq!(in_tools(1), Err(ToolError::PeerGone(Error::Closed)));
        assert!(matches!(in_tools(2), Err(ToolError::Fabric(_))));
    }
}
