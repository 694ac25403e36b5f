//! Runs the standard world of the throughput targets (see `lockstep_sim::standard`) for instruction counting,
//! which, unlike wall-clock time, does not move with the load of a shared machine. `scripts/instructions` runs
//! it under valgrind's callgrind and prints instructions per message of the world and of the bare exchange.
//!
//! `profile generate N`: only build the worlds of seeds `0..N`;
//! `profile world N`: build them and run each once, printing the messages they sent;
//! `profile bare N`: build and run them, then run the bare exchange of the same messages per seed;
//! `profile rounds N R`: then R rounds of both in alternation, as the benchmark measures them.

#[cfg(not(madsim))]
fn main() {
    eprintln!("the profile example needs the madsim build: run scripts/instructions");
    std::process::exit(2);
}

#[cfg(madsim)]
#[global_allocator]
static ALLOCATOR: lockstep_sim::alloc::Allocator = lockstep_sim::alloc::Allocator;

#[cfg(madsim)]
fn main() {
    use lockstep_sim::standard::{bare_exchange_per_seed, standard_worlds};

    let args: Vec<String> = std::env::args().skip(1).collect();
    let number = |text: &str, what: &str| match text.parse::<u64>() {
        Ok(n) if n > 0 => n,
        _ => usage(&format!("{what} {text:?} is not a positive whole number")),
    };
    let (mode, seeds, rounds) = match args.as_slice() {
        [mode, seeds] => (mode.as_str(), number(seeds, "seed count"), 1),
        [mode, seeds, rounds] if mode == "rounds" => {
            (mode.as_str(), number(seeds, "seed count"), number(rounds, "round count"))
        }
        _ => usage("expected two arguments, or three for rounds"),
    };
    if !["generate", "world", "bare", "rounds"].contains(&mode) {
        usage(&format!("unknown mode {mode:?}"));
    }
    let worlds = standard_worlds(seeds);
    if mode == "generate" {
        println!("{} worlds built", worlds.len());
        return;
    }
    let (world_s, per_seed) = timed(|| run_worlds(&worlds));
    let messages = per_seed.iter().sum::<u64>();
    println!("messages {messages}");
    println!("world seconds {world_s:.3}, {:.0} messages/s", messages as f64 / world_s);
    if mode == "world" {
        return;
    }
    let (bare_s, ()) = timed(|| bare_exchange_per_seed(&per_seed));
    println!("bare seconds {bare_s:.3}, {:.0} messages/s", messages as f64 / bare_s);
    if mode == "rounds" {
        // The benchmark's alternating rounds, for a wall-clock profile of the steady state it measures.
        let (mut worlds_s, mut bares_s, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let (world_s, _) = timed(|| run_worlds(&worlds));
            let (bare_s, ()) = timed(|| bare_exchange_per_seed(&per_seed));
            worlds_s.push(world_s);
            bares_s.push(bare_s);
            ratios.push(bare_s / world_s);
        }
        let median = |mut values: Vec<f64>| {
            values.sort_by(f64::total_cmp);
            values[values.len() / 2]
        };
        let (world_s, bare_s) = (median(worlds_s), median(bares_s));
        println!("median seconds: world {world_s:.4}, bare {bare_s:.4}");
        println!("ratio {:.2}, median of {rounds} alternating rounds", median(ratios));
    }
}

/// Seconds `f` took, and what it returned.
#[cfg(madsim)]
fn timed<T>(f: impl FnOnce() -> T) -> (f64, T) {
    let began = std::time::Instant::now();
    let value = f();
    (began.elapsed().as_secs_f64(), value)
}

/// Runs each world once; returns the messages each sent. A seed that fails ends the program.
#[cfg(madsim)]
fn run_worlds(worlds: &[std::sync::Arc<lockstep_sim::world::World>]) -> Vec<u64> {
    lockstep_sim::standard::run_standard(worlds).unwrap_or_else(|failure| {
        eprintln!("{failure}");
        std::process::exit(1);
    })
}

#[cfg(madsim)]
fn usage(problem: &str) -> ! {
    eprintln!("{problem}\nusage: profile generate|world|bare SEEDS, or profile rounds SEEDS ROUNDS");
    std::process::exit(2);
}
