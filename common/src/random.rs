//! Small deterministic random sources for load generation and benchmarks: a SplitMix64
//! generator and a Zipf sampler. Not for anything security-related.

/// SplitMix64: fast, statistically fine for picking keys, seeded explicitly so that runs can
/// be repeated.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n); `n` must be positive.
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }
}

/// Ranks 0..n drawn with probability proportional to 1 / (rank + 1)^s, by inverting a table
/// of the cumulative distribution (n f64s; exact, and a draw is one binary search).
#[derive(Clone, Debug)]
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    /// `n` must be positive and `s` finite and non-negative (s = 0 is uniform).
    pub fn new(n: usize, s: f64) -> Zipf {
        let n = n.max(1);
        let mut cdf = Vec::with_capacity(n);
        let mut total = 0.0;
        for rank in 0..n {
            total += 1.0 / ((rank + 1) as f64).powf(s);
            cdf.push(total);
        }
        for c in &mut cdf {
            *c /= total;
        }
        Zipf { cdf }
    }

    pub fn sample(&self, rng: &mut SplitMix64) -> usize {
        let u = rng.next_f64();
        self.cdf.partition_point(|c| *c < u).min(self.cdf.len() - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut rng = SplitMix64::new(1);
        let mut seen = [0u32; 10];
        for _ in 0..10_000 {
            seen[rng.below(10)] += 1;
        }
        assert!(seen.iter().all(|n| (800..1200).contains(n)), "{seen:?}");
    }

    #[test]
    fn zipf_favours_low_ranks_in_the_right_proportion() {
        let zipf = Zipf::new(1000, 1.0);
        let mut rng = SplitMix64::new(7);
        let mut counts = vec![0u32; 1000];
        for _ in 0..200_000 {
            counts[zipf.sample(&mut rng)] += 1;
        }
        // P(rank 0) / P(rank 1) = 2 for s = 1.
        let ratio = counts[0] as f64 / counts[1] as f64;
        assert!((1.8..2.2).contains(&ratio), "{ratio}");
        // H(1000) ≈ 7.485, so P(rank 0) ≈ 0.1336.
        let p0 = counts[0] as f64 / 200_000.0;
        assert!((0.125..0.142).contains(&p0), "{p0}");
        let uniform = Zipf::new(4, 0.0);
        let mut u = [0u32; 4];
        for _ in 0..40_000 {
            u[uniform.sample(&mut rng)] += 1;
        }
        assert!(u.iter().all(|n| (9000..11000).contains(n)), "{u:?}");
    }
}
