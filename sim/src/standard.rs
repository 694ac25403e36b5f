//! The standard world of the throughput targets and the bare madsim exchange it is measured against, shared by
//! the criterion benchmarks (`benches/sim.rs`) and the instruction-count example (`examples/profile.rs`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use madsim::net::Endpoint;

use crate::faults::FaultPlan;
use crate::world::{World, WorldParams};

/// The standard world: 4 shards, a full backup and 5 incrementals, about 1,000 rows at the last backup, every
/// fault kind on at the middle of its range.
pub fn standard_params() -> WorldParams {
    WorldParams {
        tables: Some(1),
        indexes: Some(false),
        shard_count: Some(4),
        incrementals: Some(5),
        // About 1,000 rows at the last backup: the workload deletes some of what it inserts.
        initial_rows: Some(1_500),
        faults: Some(FaultPlan::all(10_000)),
        ..WorldParams::default()
    }
}

/// The standard worlds of seeds `0..seeds`, shared so that runs take them without a copy, as a sweep does.
pub fn standard_worlds(seeds: u64) -> Vec<Arc<World>> {
    (0..seeds).map(|seed| Arc::new(World::generate(seed, &standard_params()))).collect()
}

/// Runs each standard world once; returns the messages each sent, or names the first seed that did not pass.
pub fn run_standard(worlds: &[Arc<World>]) -> Result<Vec<u64>, String> {
    worlds
        .iter()
        .map(|world| {
            let outcome = crate::runner::run_world(world.clone(), crate::runner::Keep::Verdict);
            if !outcome.violations.is_empty() || outcome.panic.is_some() {
                return Err(format!("seed {} failed: {:?} {:?}", world.seed, outcome.violations, outcome.panic));
            }
            Ok(outcome.messages)
        })
        .collect()
}

/// The bare exchange of each seed's messages (`per_seed[seed]`), one fresh runtime per seed.
pub fn bare_exchange_per_seed(per_seed: &[u64]) {
    for (seed, messages) in per_seed.iter().enumerate() {
        bare_exchange(seed as u64, *messages);
    }
}

/// A bare madsim exchange: 6 nodes, each pinging its neighbour and answering pings, `messages` in all (one
/// more when `messages` is odd), in a fresh runtime on a fresh thread (as the simulator runs each seed).
pub fn bare_exchange(seed: u64, messages: u64) {
    std::thread::spawn(move || {
        let runtime = madsim::runtime::Runtime::with_seed_and_config(seed, madsim::Config::default());
        runtime.block_on(exchange(messages));
    })
    .join()
    .expect("the bare exchange does not panic");
}

/// Pings node `node` of `nodes` sends when `pings` are shared out among them as evenly as they go.
fn pings_of(node: u64, nodes: u64, pings: u64) -> u64 {
    pings / nodes + u64::from(node < pings % nodes)
}

async fn exchange(messages: u64) {
    const NODES: u8 = 6;
    let handle = madsim::runtime::Handle::current();
    let addr = |i: u8| SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 1, 0, i + 1)), 7000);
    // A ping and its pong are two messages.
    let pings = messages.div_ceil(2);
    let mut clients = Vec::new();
    for i in 0..NODES {
        let node = handle.create_node().name(format!("n{i}")).ip(addr(i).ip()).build();
        let peer = addr((i + 1) % NODES);
        let rounds = pings_of(u64::from(i), u64::from(NODES), pings);
        clients.push(node.spawn(async move {
            let endpoint = Arc::new(Endpoint::bind(addr(i)).await.expect("bind"));
            let server = endpoint.clone();
            madsim::task::spawn(async move {
                loop {
                    let (ping, from) = server.recv_from_raw(1).await.expect("recv ping");
                    server.send_to_raw(from, 2, ping).await.expect("send pong");
                }
            });
            for _ in 0..rounds {
                endpoint.send_to_raw(peer, 1, Box::new(vec![7u8; 64])).await.expect("send ping");
                endpoint.recv_from_raw(2).await.expect("recv pong");
            }
        }));
    }
    for client in clients {
        client.await.expect("client finishes");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pings_are_shared_out_exactly() {
        for pings in [0, 1, 5, 6, 7, 100, 103] {
            let shares: Vec<u64> = (0..6).map(|node| pings_of(node, 6, pings)).collect();
            assert_eq!(shares.iter().sum::<u64>(), pings, "{shares:?}");
            assert!(shares.iter().max().unwrap() - shares.iter().min().unwrap() <= 1, "{shares:?}");
        }
    }
}
