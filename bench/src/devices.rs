//! `--devices`: which RDMA device, and which rails, each verbs node of a run takes.

use serde_json::Value;

/// `--devices SERVER:CLIENT`: the RDMA devices of each node, its own device first and then its
/// rails (`VerbsConfig::rails`), comma-separated: `rxe0,rxe1:rxe1,rxe0` puts the server on rxe0
/// with rail rxe1 and the client on rxe1 with rail rxe0. Rails pair up by position, so the lab's
/// two devices, one at each end of its veth wire, give two paths that each cross the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Devices {
    /// The server node's device, then its rails.
    pub server: Vec<String>,
    /// The client node's device, then its rails.
    pub client: Vec<String>,
}

impl Devices {
    /// Parses `SERVER:CLIENT` (see the type's docs). How many rails, and whether they are
    /// distinct, the verbs transport checks when the nodes connect.
    pub fn parse(s: &str) -> Result<Devices, String> {
        let (server, client) = s.split_once(':').filter(|(_, c)| !c.contains(':')).ok_or_else(|| {
            format!("{s:?}: expected SERVER:CLIENT, each a device then its rails, e.g. rxe0,rxe1:rxe1,rxe0")
        })?;
        let side = |names: &str, which: &str| -> Result<Vec<String>, String> {
            let list: Vec<String> = names.split(',').map(|n| n.trim().to_owned()).collect();
            if list.iter().any(|n| n.is_empty()) {
                return Err(format!(
                    "{s:?}: the {which}'s list {names:?} has an empty device name"
                ));
            }
            Ok(list)
        };
        Ok(Devices {
            server: side(server, "server")?,
            client: side(client, "client")?,
        })
    }

    /// `{"server": [...], "client": [...]}` for the JSON output.
    pub fn to_json(&self) -> Value {
        serde_json::json!({"server": self.server, "client": self.client})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_each_side_and_refuse_bad_lists() {
        let d = Devices::parse("rxe0,rxe1:rxe1, rxe0").unwrap();
        assert_eq!(d.server, ["rxe0", "rxe1"]);
        assert_eq!(d.client, ["rxe1", "rxe0"]);
        assert_eq!(
            d.to_json(),
            serde_json::json!({"server": ["rxe0", "rxe1"], "client": ["rxe1", "rxe0"]})
        );
        let one = Devices::parse("mlx5_0:mlx5_1").unwrap();
        assert_eq!((one.server.len(), one.client.len()), (1, 1));
        for bad in [
            "rxe0",
            "rxe0,:rxe1",
            ":rxe1",
            "rxe0:",
            "rxe0,rxe1:rxe1,,rxe0",
            "rxe0:rxe1:rxe2",
        ] {
            let e = Devices::parse(bad).unwrap_err();
            assert!(
                e.contains("SERVER:CLIENT") || e.contains("empty device name"),
                "{bad}: {e}"
            );
        }
    }
}
