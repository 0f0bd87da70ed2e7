//! Token-aware routing for the bench client: each key goes straight to one of its replicas
//! among the given endpoints, so no node forwards it (one hop less, and no forward that a
//! frozen coordinator can strand; docs/ARCHITECTURE.md, "Failover").
//!
//! The ring comes from `KV.Ring` on any endpoint, refreshed at most once a second while
//! requests say it moved (an answer's ring version differs, or it was forwarded). A key whose
//! replicas are none of the endpoints, or before the first ring arrives, goes to the session's
//! own connection as before, and the node it reaches forwards it (so does a route that is out
//! of date, or an endpoint written differently from the address the node gossips). An
//! endpoint whose request failed with UNAVAILABLE, DEADLINE_EXCEEDED or UNKNOWN (a broken
//! connection) is passed over for [`AVOID_FOR`], while a replica of the key remains among the
//! others.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use crate::cli::client::{Conn, Credentials};
use dynakv_core::NodeId;
use dynakv_core::hash::key_position;
use dynakv_core::ring::{NodeSpec, Ring};

use crate::proto::kv_client::KvClient;
use crate::proto::{Receipt, RingRequest, RingResponse};

/// How long an endpoint that failed a request is passed over.
pub const AVOID_FOR: Duration = Duration::from_secs(2);
/// The shortest time between two ring fetches.
const REFRESH_SPACING: Duration = Duration::from_secs(1);
/// Deadline of one ring fetch.
const FETCH_TIMEOUT: Duration = Duration::from_secs(2);

/// The ring as the client routes by it.
pub struct Route {
    version: u64,
    n: usize,
    ring: Ring,
    /// For each ring node (by index), the endpoint it is, if it is one of ours.
    endpoint_of: Vec<Option<usize>>,
}

impl Route {
    /// The route of a `KV.Ring` answer over `endpoints` (as given on the command line).
    pub fn from_proto(r: &RingResponse, endpoints: &[String]) -> Result<Route, String> {
        let mut specs = Vec::with_capacity(r.nodes.len());
        let mut addresses = Vec::with_capacity(r.nodes.len());
        for node in &r.nodes {
            let id = NodeId::new(&node.id).map_err(|e| format!("node {:?}: {e}", node.id))?;
            addresses.push((id.clone(), node.address.clone()));
            specs.push(NodeSpec {
                id,
                weight: node.weight,
                zone: node.zone.clone(),
                tokens: node.tokens.clone(),
            });
        }
        let ring = Ring::new(specs).map_err(|e| e.to_string())?;
        let endpoint_of = ring
            .nodes()
            .iter()
            .map(|spec| {
                let address = addresses
                    .iter()
                    .find(|(id, _)| *id == spec.id)
                    .map(|(_, a)| a.as_str())
                    .unwrap_or_default();
                endpoints
                    .iter()
                    .position(|e| !address.is_empty() && strip_scheme(e) == address)
            })
            .collect();
        Ok(Route {
            version: r.ring_version,
            n: r.n.max(1) as usize,
            ring,
            endpoint_of,
        })
    }

    /// The endpoints among `key`'s first n nodes, in ring order.
    pub fn replicas(&self, key: &[u8]) -> Vec<usize> {
        self.ring
            .walk(key_position(key), self.n)
            .take(self.n)
            .filter_map(|i| self.endpoint_of.get(i).copied().flatten())
            .collect()
    }
}

fn strip_scheme(endpoint: &str) -> &str {
    endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest)
        .trim_end_matches('/')
}

/// Shared by every session of one bench run.
pub struct Router {
    endpoints: Vec<String>,
    /// One connection per endpoint, for routed requests.
    channels: Vec<Conn>,
    route: RwLock<Option<Arc<Route>>>,
    stale: AtomicBool,
    started: Instant,
    /// Per endpoint: milliseconds since `started` until which it is passed over.
    avoid_until: Vec<AtomicU64>,
}

impl Router {
    /// A router over `endpoints`, with one lazily connected channel each. Fetches the ring once
    /// before it returns (a failure leaves it to the background), then in the background for as
    /// long as the router lives.
    pub async fn start(
        endpoints: &[String],
        request_timeout: Duration,
        credentials: &Credentials,
    ) -> Result<Arc<Router>, String> {
        let channels = endpoints
            .iter()
            .map(|ep| {
                credentials.endpoint(ep).map(|e| {
                    credentials.connect_lazy(
                        e.timeout(request_timeout).tcp_nodelay(true),
                        Duration::from_secs(2),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let router = Arc::new(Router {
            endpoints: endpoints.to_vec(),
            avoid_until: endpoints.iter().map(|_| AtomicU64::new(0)).collect(),
            channels,
            route: RwLock::new(None),
            stale: AtomicBool::new(true),
            started: Instant::now(),
        });
        router.fetch(&mut 0).await;
        tokio::spawn(refresh(Arc::downgrade(&router)));
        Ok(router)
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Where to send `key` from session `task`: a replica's endpoint (sessions spread over the
    /// replicas), or `None` for the session's own connection.
    pub fn pick(&self, key: &[u8], task: usize) -> Option<usize> {
        let route = self
            .route
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        let now = self.now_ms();
        let replicas: Vec<usize> = route
            .replicas(key)
            .into_iter()
            .filter(|&e| self.avoid_until[e].load(Ordering::Relaxed) <= now)
            .collect();
        if replicas.is_empty() {
            return None;
        }
        Some(replicas[task % replicas.len()])
    }

    pub fn client(&self, endpoint: usize) -> KvClient<Conn> {
        KvClient::new(self.channels[endpoint].clone())
            .max_decoding_message_size(crate::peer::MAX_PEER_MESSAGE_BYTES)
            .max_encoding_message_size(crate::peer::MAX_PEER_MESSAGE_BYTES)
    }

    /// Takes note of an answer's receipt: a forwarded request or another ring version means the
    /// route is out of date.
    pub fn note(&self, receipt: Option<&Receipt>) {
        let Some(receipt) = receipt else { return };
        let version = self
            .route
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|r| r.version);
        if receipt.forwarded || version != Some(receipt.ring_version) {
            self.stale.store(true, Ordering::Relaxed);
        }
    }

    /// Takes note of a failed request to `endpoint`.
    pub fn failed(&self, endpoint: usize, status: &tonic::Status) {
        if matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
        ) {
            let until = self.now_ms() + AVOID_FOR.as_millis() as u64;
            self.avoid_until[endpoint].store(until, Ordering::Relaxed);
            self.stale.store(true, Ordering::Relaxed);
        }
    }
}

/// What one round of [`Router::fetch`] came to.
#[derive(PartialEq)]
enum Fetched {
    Yes,
    No,
    /// The nodes have no `KV.Ring`: route nothing, ask no more.
    Unsupported,
}

impl Router {
    /// Asks the endpoints in turn, from `next` on and skipping ones passed over, until one
    /// gives a ring; the stale mark stays while none does.
    async fn fetch(&self, next: &mut usize) -> Fetched {
        self.stale.store(false, Ordering::Relaxed);
        let now = self.now_ms();
        let candidates: Vec<usize> = (0..self.endpoints.len())
            .map(|k| (*next + k) % self.endpoints.len())
            .filter(|&e| self.avoid_until[e].load(Ordering::Relaxed) <= now)
            .collect();
        for e in candidates {
            let mut request = tonic::Request::new(RingRequest {});
            request.set_timeout(FETCH_TIMEOUT);
            match self.client(e).ring(request).await {
                Ok(answer) => match Route::from_proto(answer.get_ref(), &self.endpoints) {
                    Ok(route) => {
                        *self.route.write().unwrap_or_else(|p| p.into_inner()) =
                            Some(Arc::new(route));
                        *next = e + 1;
                        return Fetched::Yes;
                    }
                    Err(error) => {
                        tracing::debug!(endpoint = %self.endpoints[e], %error, "bad ring");
                    }
                },
                Err(status) if status.code() == tonic::Code::Unimplemented => {
                    return Fetched::Unsupported;
                }
                Err(status) => tracing::debug!(endpoint = %self.endpoints[e], %status, "no ring"),
            }
        }
        self.stale.store(true, Ordering::Relaxed);
        Fetched::No
    }
}

/// Fetches the ring whenever it is stale, at most once per [`REFRESH_SPACING`], until the
/// router is dropped.
async fn refresh(router: Weak<Router>) {
    let mut next = 0usize;
    loop {
        tokio::time::sleep(REFRESH_SPACING).await;
        let Some(r) = router.upgrade() else { return };
        if r.stale.load(Ordering::Relaxed) && r.fetch(&mut next).await == Fetched::Unsupported {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::RingNode;
    use dynakv_core::ring::Member;

    fn answer(n: u32, addresses: &[&str]) -> RingResponse {
        let members: Vec<Member> = (1..=addresses.len())
            .map(|i| Member {
                id: NodeId::new(format!("n{i}")).unwrap(),
                weight: 100,
                zone: None,
            })
            .collect();
        let ring = Ring::balanced(&members, 64, n as usize);
        RingResponse {
            ring_version: ring.version(),
            n,
            nodes: ring
                .nodes()
                .iter()
                .zip(addresses)
                .map(|(spec, address)| RingNode {
                    id: spec.id.to_string(),
                    address: address.to_string(),
                    weight: spec.weight,
                    zone: None,
                    tokens: spec.tokens.clone(),
                })
                .collect(),
        }
    }

    #[test]
    fn a_key_goes_to_its_replicas_among_the_endpoints_as_the_node_computes_them() {
        let addresses = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:4"];
        let r = answer(3, &addresses);
        let endpoints: Vec<String> = vec![
            "http://127.0.0.1:4".into(),
            "127.0.0.1:2".into(),
            "127.0.0.1:1".into(),
        ];
        let route = Route::from_proto(&r, &endpoints).unwrap();
        let ring = Ring::new(
            r.nodes
                .iter()
                .map(|n| NodeSpec {
                    id: NodeId::new(&n.id).unwrap(),
                    weight: n.weight,
                    zone: None,
                    tokens: n.tokens.clone(),
                })
                .collect(),
        )
        .unwrap();
        for k in 0..500u32 {
            let key = format!("key-{k}");
            let want: Vec<String> = ring
                .walk(key_position(key.as_bytes()), 3)
                .take(3)
                .map(|i| ring.nodes()[i].id.to_string())
                .collect();
            let got: Vec<String> = route
                .replicas(key.as_bytes())
                .into_iter()
                .map(|e| {
                    let address = strip_scheme(&endpoints[e]);
                    let i = addresses.iter().position(|a| *a == address).unwrap();
                    format!("n{}", i + 1)
                })
                .collect();
            assert!(!got.is_empty() || want.iter().all(|w| w == "n3"));
            assert!(
                got.iter().all(|g| want.contains(g)),
                "{key}: {got:?} not in {want:?}"
            );
            assert!(!got.contains(&"n3".to_string()), "n3 is no endpoint");
            assert_eq!(got.len(), want.iter().filter(|w| *w != "n3").count());
        }
    }

    #[tokio::test]
    async fn a_failed_endpoint_is_passed_over_and_a_moved_ring_marks_the_route_stale() {
        let addresses = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"];
        let r = answer(3, &addresses);
        let endpoints: Vec<String> = addresses.iter().map(|a| a.to_string()).collect();
        let route = Route::from_proto(&r, &endpoints).unwrap();
        let router = Router {
            channels: endpoints
                .iter()
                .map(|e| {
                    let c = Credentials::default();
                    c.connect_lazy(c.endpoint(e).unwrap(), Duration::from_secs(1))
                })
                .collect(),
            avoid_until: endpoints.iter().map(|_| AtomicU64::new(0)).collect(),
            endpoints,
            route: RwLock::new(Some(Arc::new(route))),
            stale: AtomicBool::new(false),
            started: Instant::now(),
        };
        let stale = || router.stale.load(Ordering::Relaxed);
        let picks =
            |key: &[u8]| -> Vec<Option<usize>> { (0..6).map(|t| router.pick(key, t)).collect() };

        // n = 3 over three endpoints: every endpoint replicates every key, and the sessions
        // spread over all three.
        let mut spread: Vec<usize> = picks(b"k").into_iter().map(Option::unwrap).collect();
        spread.sort_unstable();
        spread.dedup();
        assert_eq!(spread, vec![0, 1, 2]);

        // A refusal of bad input says nothing about the endpoint.
        router.failed(0, &tonic::Status::invalid_argument("key too long"));
        assert!(picks(b"k").contains(&Some(0)));
        assert!(!stale());

        // A broken connection: the endpoint is passed over, and the ring is to be asked again.
        router.failed(0, &tonic::Status::unavailable("connection refused"));
        assert!(stale());
        for pick in picks(b"k") {
            assert!(matches!(pick, Some(1) | Some(2)), "{pick:?}");
        }
        // With every replica passed over, the session's own connection takes the key.
        router.failed(1, &tonic::Status::deadline_exceeded("timed out"));
        router.failed(2, &tonic::Status::unknown("connection reset"));
        assert_eq!(picks(b"k"), vec![None; 6]);

        // Answers: the same ring and no forward leave the route alone; a forward or another
        // ring version mark it stale.
        router.stale.store(false, Ordering::Relaxed);
        let receipt = |ring_version, forwarded| Receipt {
            ring_version,
            forwarded,
            ..Default::default()
        };
        router.note(None);
        router.note(Some(&receipt(r.ring_version, false)));
        assert!(!stale());
        router.note(Some(&receipt(r.ring_version, true)));
        assert!(stale());
        router.stale.store(false, Ordering::Relaxed);
        router.note(Some(&receipt(r.ring_version ^ 1, false)));
        assert!(stale());
    }

    #[test]
    fn a_node_without_an_address_or_a_bad_answer_routes_nothing_to_it() {
        let mut r = answer(3, &["127.0.0.1:1", "", "127.0.0.1:3"]);
        let endpoints: Vec<String> = vec!["127.0.0.1:1".into(), "127.0.0.1:3".into()];
        let route = Route::from_proto(&r, &endpoints).unwrap();
        for k in 0..100u32 {
            assert!(route.replicas(format!("k{k}").as_bytes()).len() <= 2);
        }
        r.nodes[0].id = "not a valid id!".into();
        assert!(Route::from_proto(&r, &endpoints).is_err());
    }
}
