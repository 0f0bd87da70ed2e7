//! What a benchmark does, independent of the store it runs against: the operation mix
//! ([`Workload`]), which keys it touches ([`KeyChooser`]: uniform or zipfian), the key and value
//! bytes, and the shopping-cart update. The flags that choose them ([`WorkloadArgs`]) are shared
//! by `dynakv bench` and the peer drivers (`dynakv-peer-bench`), so both run the same workload.

use std::fmt;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use clap::{Args, ValueEnum};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

/// The operations a workload issues.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Op {
    /// Read one key (DynaKV `Get`, etcd `Range`).
    Read,
    /// Overwrite one key with a fresh value, without reading it first (a blind write).
    Update,
    /// Read a cart, add an item, write it back based on what was read (context or revision).
    Cart,
    /// The load phase: write every key once.
    Insert,
}

impl Op {
    pub const ALL: [Op; 4] = [Op::Read, Op::Update, Op::Cart, Op::Insert];

    /// Stable name, used in the table, the JSON report and the progress line.
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Update => "update",
            Op::Cart => "cart",
            Op::Insert => "insert",
        }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            Op::Read => 0,
            Op::Update => 1,
            Op::Cart => 2,
            Op::Insert => 3,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The YCSB-style operation mixes.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// 50% read, 50% update (YCSB A, "update heavy").
    A,
    /// 95% read, 5% update (YCSB B, "read mostly").
    B,
    /// 100% read (YCSB C).
    C,
    /// 100% update (write only).
    W,
    /// 100% cart: read the cart, add an item, write it back with what was read.
    Cart,
}

impl Workload {
    /// Chance in per mille that the next operation is a read (the rest is the workload's write).
    fn read_per_mille(self) -> u32 {
        match self {
            Workload::A => 500,
            Workload::B => 950,
            Workload::C => 1000,
            Workload::W | Workload::Cart => 0,
        }
    }

    /// Draws the next operation.
    pub fn next_op(self, rng: &mut impl Rng) -> Op {
        let write = if self == Workload::Cart {
            Op::Cart
        } else {
            Op::Update
        };
        match self.read_per_mille() {
            0 => write,
            1000 => Op::Read,
            p if rng.random_range(0..1000) < p => Op::Read,
            _ => write,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Workload::A => "A",
            Workload::B => "B",
            Workload::C => "C",
            Workload::W => "W",
            Workload::Cart => "cart",
        }
    }

    /// One line for the report header.
    pub fn describe(self) -> &'static str {
        match self {
            Workload::A => "A (50% read, 50% update)",
            Workload::B => "B (95% read, 5% update)",
            Workload::C => "C (100% read)",
            Workload::W => "W (100% update)",
            Workload::Cart => "cart (read, add an item, write back with the read's context)",
        }
    }
}

/// How keys are drawn from `0..keys`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Distribution {
    /// Every key equally likely.
    Uniform,
    /// Zipfian (YCSB's constant 0.99), hot keys scattered over the key space.
    Zipfian,
}

impl Distribution {
    pub fn name(self) -> &'static str {
        match self {
            Distribution::Uniform => "uniform",
            Distribution::Zipfian => "zipfian",
        }
    }
}

/// The workload flags shared by `dynakv bench` and `dynakv-peer-bench`.
#[derive(Args, Debug, Clone)]
pub struct WorkloadArgs {
    /// Operation mix.
    #[arg(long, short = 'W', value_enum, ignore_case = true, default_value_t = Workload::A)]
    pub workload: Workload,
    /// Key distribution.
    #[arg(long, short = 'd', value_enum, ignore_case = true, default_value_t = Distribution::Zipfian)]
    pub distribution: Distribution,
    /// Number of distinct keys (key i is "<prefix><i, 12 digits>").
    #[arg(long, short = 'k', default_value_t = 100_000)]
    pub keys: u64,
    /// Prefix of every key, so runs can use separate key spaces.
    #[arg(long, default_value = "bench/")]
    pub key_prefix: String,
    /// Bytes per written value (for `cart`: the cart's size limit; older items drop out).
    #[arg(long, short = 's', default_value_t = 1024)]
    pub value_size: usize,
    /// Concurrent client tasks (each has one request in flight at a time).
    #[arg(long, short = 'c', default_value_t = 16)]
    pub clients: usize,
    /// gRPC connections the client tasks share (task i uses connection i mod channels; connection
    /// j goes to endpoint j mod endpoints). Default: one per endpoint.
    #[arg(long)]
    pub channels: Option<usize>,
    /// How long to measure, after the warm-up ("30s", "500ms", "2m"; a bare number is seconds).
    /// Ignored when --ops is given.
    #[arg(long, short = 't', default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Measure this many operations (after the warm-up) instead of a duration.
    #[arg(long)]
    pub ops: Option<u64>,
    /// Run the workload this long before measuring (not recorded).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Load phase first: write every key once (in order, spread over the clients), measured
    /// and reported separately. Needed before read workloads on an empty store.
    #[arg(long)]
    pub load: bool,
    /// Only load (implies --load); no workload phase.
    #[arg(long)]
    pub load_only: bool,
    /// Seed of the key and operation choices (each client task derives its own).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// No live progress line on standard error.
    #[arg(long)]
    pub no_progress: bool,
}

impl WorkloadArgs {
    /// Refuses values the runner cannot use, with a message naming the flag.
    pub fn validate(&self) -> Result<(), String> {
        if self.keys == 0 {
            return Err("--keys must be at least 1".into());
        }
        if self.clients == 0 {
            return Err("--clients must be at least 1".into());
        }
        if self.channels == Some(0) {
            return Err("--channels must be at least 1".into());
        }
        if self.duration.is_zero() && self.ops.is_none() && !self.load_only {
            return Err("--duration must be longer than 0 (or give --ops)".into());
        }
        if self.key_prefix.len() + KEY_DIGITS > 1024 {
            return Err("--key-prefix is too long (keys are limited to 1 KiB)".into());
        }
        Ok(())
    }

    /// The builder of this run's keys.
    pub fn key_space(&self) -> KeySpace {
        KeySpace {
            prefix: Bytes::copy_from_slice(self.key_prefix.as_bytes()),
            keys: self.keys,
        }
    }

    /// The key chooser of client task `task`, seeded from `--seed` and the task number.
    pub fn chooser(&self, task: usize, zipf: &std::sync::Arc<Zipfian>) -> KeyChooser {
        let rng = SmallRng::seed_from_u64(task_seed(self.seed, task));
        match self.distribution {
            Distribution::Uniform => KeyChooser::Uniform {
                rng,
                keys: self.keys,
            },
            Distribution::Zipfian => KeyChooser::Zipfian {
                rng,
                zipf: std::sync::Arc::clone(zipf),
            },
        }
    }
}

/// Parses "10s", "250ms", "2m", "1h" or a bare number of seconds (fractions allowed).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration: use e.g. 30s, 500ms, 2m"))?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?}: use ms, s, m or h"
            ));
        }
    };
    if !(0.0..=1e9).contains(&seconds) {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Independent per-task seeds from one run seed (splitmix64 of seed + task).
pub fn task_seed(seed: u64, task: usize) -> u64 {
    let mut z = seed.wrapping_add(
        (task as u64)
            .wrapping_add(1)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15),
    );
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Digits of the key number: fixed width, so every key has the same length.
pub const KEY_DIGITS: usize = 12;

/// Keys `"<prefix><number, zero-padded to 12 digits>"`.
#[derive(Clone, Debug)]
pub struct KeySpace {
    prefix: Bytes,
    keys: u64,
}

impl KeySpace {
    pub fn len(&self) -> u64 {
        self.keys
    }

    pub fn is_empty(&self) -> bool {
        self.keys == 0
    }

    /// The bytes of key `index`: one small allocation, written without formatting machinery.
    pub fn key(&self, index: u64) -> Bytes {
        let mut out = BytesMut::with_capacity(self.prefix.len() + KEY_DIGITS);
        out.put_slice(&self.prefix);
        let mut digits = [b'0'; KEY_DIGITS];
        let mut n = index;
        for d in digits.iter_mut().rev() {
            *d = b'0' + (n % 10) as u8;
            n /= 10;
        }
        out.put_slice(&digits);
        out.freeze()
    }
}

/// Draws key indexes for one client task.
#[derive(Debug)]
pub enum KeyChooser {
    Uniform {
        rng: SmallRng,
        keys: u64,
    },
    Zipfian {
        rng: SmallRng,
        zipf: std::sync::Arc<Zipfian>,
    },
}

impl KeyChooser {
    pub fn next_key(&mut self) -> u64 {
        match self {
            KeyChooser::Uniform { rng, keys } => rng.random_range(0..*keys),
            KeyChooser::Zipfian { rng, zipf } => zipf.sample(rng),
        }
    }

    /// The task's random source, also used to pick operations and cart items.
    pub fn rng(&mut self) -> &mut SmallRng {
        match self {
            KeyChooser::Uniform { rng, .. } | KeyChooser::Zipfian { rng, .. } => rng,
        }
    }
}

/// YCSB's zipfian generator (Gray et al., "Quickly generating billion-record synthetic
/// databases", SIGMOD 1994) over `0..items`, followed by a fixed permutation of the items so that
/// the hottest keys are scattered over the key space rather than being keys 0, 1, 2, ...
///
/// Rank 0 is the most popular item; with `theta = 0.99` and 100 000 items it takes about 8% of
/// the draws and the top 1% of items take about 60%.
#[derive(Clone, Debug)]
pub struct Zipfian {
    items: u64,
    theta: f64,
    alpha: f64,
    zetan: f64,
    eta: f64,
    /// Multiplier of the permutation `rank -> (rank * multiplier + offset) mod items`: coprime
    /// with `items`, so the map is a bijection.
    multiplier: u64,
    offset: u64,
}

/// YCSB's default zipfian constant.
pub const ZIPFIAN_CONSTANT: f64 = 0.99;

impl Zipfian {
    /// A generator over `0..items` (at least 1). Costs O(items) once, for the zeta constant.
    pub fn new(items: u64, theta: f64) -> Zipfian {
        let items = items.max(1);
        let zetan = zeta(items, theta);
        let zeta2 = zeta(2, theta);
        let eta = (1.0 - (2.0 / items as f64).powf(1.0 - theta)) / (1.0 - zeta2 / zetan);
        let mut multiplier = 0x9E37_79B9_7F4A_7C15_u64 % items;
        while gcd(multiplier, items) != 1 {
            multiplier += 1;
        }
        Zipfian {
            items,
            theta,
            alpha: 1.0 / (1.0 - theta),
            zetan,
            eta,
            multiplier,
            offset: 0x2545_F491_4F6C_DD1D_u64 % items,
        }
    }

    /// The rank of the next draw (0 = most popular), before the permutation.
    pub fn sample_rank(&self, rng: &mut impl RngCore) -> u64 {
        let u: f64 = rng.random();
        let uz = u * self.zetan;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + 0.5f64.powf(self.theta) {
            return 1.min(self.items - 1);
        }
        let rank = (self.items as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64;
        rank.min(self.items - 1)
    }

    /// The item of rank `rank`.
    pub fn item_of_rank(&self, rank: u64) -> u64 {
        ((u128::from(rank) * u128::from(self.multiplier) + u128::from(self.offset))
            % u128::from(self.items)) as u64
    }

    /// The next item.
    pub fn sample(&self, rng: &mut impl RngCore) -> u64 {
        self.item_of_rank(self.sample_rank(rng))
    }
}

fn zeta(n: u64, theta: f64) -> f64 {
    (1..=n).map(|i| 1.0 / (i as f64).powf(theta)).sum()
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Bytes of one cart item.
pub const CART_ITEM_BYTES: usize = 16;

/// A cart after adding `item`: the items of every value read (siblings are merged by union, in
/// order of first appearance), then `item`; the oldest items drop out so that the cart stays
/// within `max_bytes` (at least one item). Values are read as a sequence of 16-byte items (a
/// trailing partial item is ignored), so any value, also one written by the load phase, is a cart.
pub fn cart_add(values: &[Bytes], item: [u8; CART_ITEM_BYTES], max_bytes: usize) -> Bytes {
    let max_items = (max_bytes / CART_ITEM_BYTES).max(1);
    let mut items: Vec<&[u8]> = Vec::new();
    for value in values {
        for chunk in value.chunks_exact(CART_ITEM_BYTES) {
            // Carts are small (tens of items): a linear scan beats hashing here.
            if !items.contains(&chunk) {
                items.push(chunk);
            }
        }
    }
    items.retain(|i| *i != item.as_slice());
    let keep_old = max_items - 1;
    let skip = items.len().saturating_sub(keep_old);
    let mut out = BytesMut::with_capacity((items.len() - skip + 1) * CART_ITEM_BYTES);
    for i in &items[skip..] {
        out.put_slice(i);
    }
    out.put_slice(&item);
    out.freeze()
}

/// A value of `size` random bytes (random, so no layer can compress it away).
pub fn random_value(size: usize, rng: &mut impl RngCore) -> Bytes {
    let mut v = vec![0u8; size];
    rng.fill_bytes(&mut v);
    Bytes::from(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_and_without_units() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn keys_have_a_fixed_width() {
        let space = KeySpace {
            prefix: Bytes::from_static(b"b/"),
            keys: 10,
        };
        assert_eq!(&space.key(0)[..], b"b/000000000000");
        assert_eq!(&space.key(1234)[..], b"b/000000001234");
    }

    #[test]
    fn zipfian_permutation_is_a_bijection() {
        for items in [1u64, 2, 7, 100, 1000, 4096] {
            let z = Zipfian::new(items, ZIPFIAN_CONSTANT);
            let mut seen: Vec<u64> = (0..items).map(|r| z.item_of_rank(r)).collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..items).collect::<Vec<_>>(), "items={items}");
        }
    }

    #[test]
    fn zipfian_draws_favour_low_ranks_and_stay_in_range() {
        let z = Zipfian::new(100_000, ZIPFIAN_CONSTANT);
        let mut rng = SmallRng::seed_from_u64(7);
        let draws = 200_000;
        let mut top = 0;
        for _ in 0..draws {
            let rank = z.sample_rank(&mut rng);
            assert!(rank < 100_000);
            if rank < 1000 {
                top += 1;
            }
        }
        // The top 1% of ranks take a large share (about 60% with theta 0.99).
        let share = f64::from(top) / f64::from(draws);
        assert!((0.5..0.7).contains(&share), "share {share}");
    }

    #[test]
    fn uniform_chooser_is_reproducible_from_the_seed() {
        let args = WorkloadArgs {
            workload: Workload::A,
            distribution: Distribution::Uniform,
            keys: 1000,
            key_prefix: "x".into(),
            value_size: 10,
            clients: 1,
            channels: None,
            duration: Duration::from_secs(1),
            ops: None,
            warmup: Duration::ZERO,
            load: false,
            load_only: false,
            seed: 3,
            no_progress: true,
        };
        let zipf = std::sync::Arc::new(Zipfian::new(1000, ZIPFIAN_CONSTANT));
        let a: Vec<u64> = {
            let mut c = args.chooser(0, &zipf);
            (0..20).map(|_| c.next_key()).collect()
        };
        let b: Vec<u64> = {
            let mut c = args.chooser(0, &zipf);
            (0..20).map(|_| c.next_key()).collect()
        };
        let other: Vec<u64> = {
            let mut c = args.chooser(1, &zipf);
            (0..20).map(|_| c.next_key()).collect()
        };
        assert_eq!(a, b);
        assert_ne!(a, other);
        assert!(a.iter().all(|k| *k < 1000));
    }

    #[test]
    fn workload_mixes_match_their_names() {
        let mut rng = SmallRng::seed_from_u64(1);
        let reads = |w: Workload, rng: &mut SmallRng| {
            (0..10_000).filter(|_| w.next_op(rng) == Op::Read).count()
        };
        assert_eq!(reads(Workload::C, &mut rng), 10_000);
        assert_eq!(reads(Workload::W, &mut rng), 0);
        let a = reads(Workload::A, &mut rng);
        assert!((4_700..5_300).contains(&a), "A reads {a}");
        let b = reads(Workload::B, &mut rng);
        assert!((9_300..9_700).contains(&b), "B reads {b}");
        assert_eq!(Workload::Cart.next_op(&mut rng), Op::Cart);
    }

    #[test]
    fn cart_merges_siblings_adds_the_item_and_stays_bounded() {
        let item = |b: u8| [b; CART_ITEM_BYTES];
        let a = Bytes::from([item(1), item(2)].concat());
        let b = Bytes::from([item(2), item(3)].concat());
        let cart = cart_add(&[a, b], item(4), 1024);
        assert_eq!(
            cart,
            Bytes::from([item(1), item(2), item(3), item(4)].concat())
        );
        // Bounded: 3 items fit, the oldest drops out.
        let small = cart_add(&[cart], item(5), 3 * CART_ITEM_BYTES);
        assert_eq!(small, Bytes::from([item(3), item(4), item(5)].concat()));
        // An empty read gives a cart of one item; adding an item already there moves it last.
        assert_eq!(cart_add(&[], item(9), 0), Bytes::from(item(9).to_vec()));
        let again = cart_add(&[small], item(3), 1024);
        assert_eq!(again, Bytes::from([item(4), item(5), item(3)].concat()));
    }
}
