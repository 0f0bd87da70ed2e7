//! The network seam: how a node opens channels to its peers. Real TCP (leaving from the node's
//! own listen IP, so faults can be injected per node on one machine) or, in the deterministic
//! simulation, the simulator's TCP.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

type MakeChannel = dyn Fn(Endpoint) -> Channel + Send + Sync;

/// Opens lazily-connecting gRPC channels to peer addresses.
#[derive(Clone)]
pub struct Connector {
    local_ip: Option<IpAddr>,
    connect_timeout: Duration,
    make: Arc<MakeChannel>,
}

impl Connector {
    /// Real TCP; outgoing connections are bound to `local_ip` when given.
    pub fn tcp(local_ip: Option<IpAddr>, connect_timeout: Duration) -> Connector {
        Connector {
            local_ip,
            connect_timeout,
            make: Arc::new(|endpoint: Endpoint| endpoint.connect_lazy()),
        }
    }

    /// A custom transport (the simulation): `make` turns a configured endpoint into a channel,
    /// typically with `Endpoint::connect_with_connector_lazy`.
    pub fn custom(
        connect_timeout: Duration,
        make: impl Fn(Endpoint) -> Channel + Send + Sync + 'static,
    ) -> Connector {
        Connector {
            local_ip: None,
            connect_timeout,
            make: Arc::new(make),
        }
    }

    /// A channel to `address` (host:port). Connects on first use and reconnects after failures.
    pub fn channel(&self, address: &str) -> Channel {
        let endpoint = match Endpoint::from_shared(format!("http://{address}")) {
            Ok(e) => e,
            // An address that does not parse can never be reached; a channel to a reserved
            // address fails every call, which is the honest outcome.
            Err(_) => Endpoint::from_static("http://0.0.0.0:1"),
        };
        let endpoint = endpoint
            .local_address(self.local_ip)
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(3))
            .keep_alive_while_idle(true)
            .initial_stream_window_size(Some(4 * 1024 * 1024))
            .initial_connection_window_size(Some(16 * 1024 * 1024));
        (self.make)(endpoint)
    }
}
