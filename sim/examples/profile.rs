//! Runs the standard world of the throughput targets (see `lockstep_sim::standard`) for instruction counting,
//! which, unlike wall-clock time, does not move with the load of a shared machine. `scripts/instructions` runs
//! it under valgrind's callgrind and prints instructions per message of the world and of the bare exchange.
//!
//! `profile generate N`: only build the worlds of seeds `0..N`;
//! `profile world N`: build them and run each once, printing the messages they sent;
//! `profile bare N`: build and run them, then run the bare exchange of the same messages per seed.

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
    use lockstep_sim::runner::run_world;
    use lockstep_sim::standard::{bare_exchange, standard_worlds};

    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, seeds) = match args.as_slice() {
        [mode, seeds] => match seeds.parse::<u64>() {
            Ok(seeds) if seeds > 0 => (mode.as_str(), seeds),
            _ => usage(&format!("seed count {seeds:?} is not a positive whole number")),
        },
        _ => usage("expected two arguments"),
    };
    if !["generate", "world", "bare"].contains(&mode) {
        usage(&format!("unknown mode {mode:?}"));
    }
    let worlds = standard_worlds(seeds);
    if mode == "generate" {
        println!("{} worlds built", worlds.len());
        return;
    }
    let mut per_seed = Vec::with_capacity(worlds.len());
    for world in &worlds {
        let outcome = run_world(world.clone(), false);
        if !outcome.violations.is_empty() || outcome.panic.is_some() {
            eprintln!("seed {} failed: {:?} {:?}", world.seed, outcome.violations, outcome.panic);
            std::process::exit(1);
        }
        per_seed.push(outcome.messages);
    }
    println!("messages {}", per_seed.iter().sum::<u64>());
    if mode == "bare" {
        for (seed, messages) in per_seed.iter().enumerate() {
            bare_exchange(seed as u64, *messages);
        }
    }
}

#[cfg(madsim)]
fn usage(problem: &str) -> ! {
    eprintln!("{problem}\nusage: profile generate|world|bare SEEDS");
    std::process::exit(2);
}
