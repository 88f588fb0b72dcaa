//! Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty, with a
//! seeded deterministic PRNG.
//!
//! The order is HF transformers': repetition penalty, then temperature, then top-k, then top-p, then a
//! draw from the renormalised distribution. Greedy (`temperature == 0`) takes the argmax after the
//! repetition penalty; ties go to the lowest id.

/// How to pick tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p` (1.0: all).
    pub top_p: f32,
    /// HF's repetition penalty over the prompt and generated tokens: positive logits are divided by it,
    /// negative ones multiplied (1.0: off).
    pub repetition_penalty: f32,
    /// Seed of the PRNG.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::greedy()
    }
}

impl SamplingParams {
    /// Argmax decoding.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }

    /// Whether tokens are picked by argmax.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// Rejects values that have no meaning.
    pub fn validate(&self) -> Result<(), String> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!("temperature {} must be >= 0", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top-p {} must be in (0, 1]", self.top_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(format!(
                "repetition penalty {} must be > 0",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

/// SplitMix64: a small, fast, well-mixed deterministic generator (the same seed gives the same stream on
/// every platform).
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Picks tokens for one sequence: the parameters plus the PRNG's state.
#[derive(Debug, Clone)]
pub struct Sampler {
    pub params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = Rng::new(params.seed);
        Self { params, rng }
    }

    /// The next token given the logits of the last position and the tokens seen so far (for the
    /// repetition penalty).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let mut logits = logits.to_vec();
        apply_repetition_penalty(&mut logits, history, self.params.repetition_penalty);
        if self.params.is_greedy() {
            return argmax(&logits);
        }
        let probs = filtered_probs(
            &logits,
            self.params.temperature,
            self.params.top_k,
            self.params.top_p,
        );
        let u = self.rng.next_f64();
        let mut acc = 0.0f64;
        for &(id, p) in &probs {
            acc += p;
            if u < acc {
                return id;
            }
        }
        probs.last().map_or(0, |&(id, _)| id)
    }

    /// The distribution [`sample`](Self::sample) draws from, most likely first: one certain token when
    /// greedy.
    pub fn distribution(&self, logits: &[f32], history: &[u32]) -> Vec<(u32, f64)> {
        let mut logits = logits.to_vec();
        apply_repetition_penalty(&mut logits, history, self.params.repetition_penalty);
        if self.params.is_greedy() {
            return vec![(argmax(&logits), 1.0)];
        }
        filtered_probs(
            &logits,
            self.params.temperature,
            self.params.top_k,
            self.params.top_p,
        )
    }

    /// Speculative sampling's test of a draft `token` drawn from `draft` against the target distribution
    /// `target` (both from [`distribution`](Self::distribution)): accepted with probability
    /// `min(1, p(token) / q(token))`, else replaced by a draw from `max(0, p - q)` renormalised. The
    /// accepted-or-replaced token is distributed exactly as a draw from `target` (Leviathan et al. 2023).
    /// Greedy distributions are certain, so no random number decides: the draft stands iff it is the
    /// target's argmax. Returns `Ok(token)` when accepted, `Err(replacement)` when not.
    pub fn verify(&mut self, token: u32, draft: &[(u32, f64)], target: &[(u32, f64)]) -> Result<u32, u32> {
        let prob =
            |dist: &[(u32, f64)], id: u32| dist.iter().find(|&&(t, _)| t == id).map_or(0.0, |&(_, p)| p);
        let (p, q) = (prob(target, token), prob(draft, token));
        if p >= q || (p > 0.0 && self.rng.next_f64() < p / q) {
            return Ok(token);
        }
        let mut residual: Vec<(u32, f64)> = target
            .iter()
            .map(|&(id, p)| (id, (p - prob(draft, id)).max(0.0)))
            .filter(|&(_, r)| r > 0.0)
            .collect();
        if residual.is_empty() {
            residual = target.to_vec();
        }
        Err(self.draw(&residual))
    }

    /// A draw from a (possibly unnormalised) distribution; the certain token without a random number.
    pub fn draw(&mut self, dist: &[(u32, f64)]) -> u32 {
        if let [(id, _)] = dist {
            return *id;
        }
        let total: f64 = dist.iter().map(|&(_, p)| p).sum();
        let u = self.rng.next_f64() * total;
        let mut acc = 0.0f64;
        for &(id, p) in dist {
            acc += p;
            if u < acc {
                return id;
            }
        }
        dist.last().map_or(0, |&(id, _)| id)
    }
}

/// HF's repetition penalty, once per distinct token of `history`.
pub fn apply_repetition_penalty(logits: &mut [f32], history: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = vec![false; logits.len()];
    for &id in history {
        let i = id as usize;
        if i < logits.len() && !seen[i] {
            seen[i] = true;
            let x = logits[i];
            logits[i] = if x > 0.0 { x / penalty } else { x * penalty };
        }
    }
}

/// Index of the largest logit (the lowest index among equals; NaN never wins unless every logit is
/// NaN, then 0).
///
/// Two passes that vectorise: the largest value (lane-wise maxima over 16 lanes), then its first
/// index. A decode step calls this on the whole vocabulary (32000 to 129280 logits).
pub fn argmax(logits: &[f32]) -> u32 {
    const L: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; L];
    let chunks = logits.chunks_exact(L);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (m, &x) in lanes.iter_mut().zip(chunk) {
            // `x > m` is false for a NaN `x`, so NaNs never enter the maxima.
            *m = if x > *m { x } else { *m };
        }
    }
    let max = lanes
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    logits.iter().position(|&x| x == max).unwrap_or(0) as u32
}

/// The candidate tokens and their renormalised probabilities after temperature, top-k and top-p, most
/// likely first (ties by lowest id).
pub fn filtered_probs(logits: &[f32], temperature: f32, top_k: usize, top_p: f32) -> Vec<(u32, f64)> {
    let t = temperature as f64;
    let mut order: Vec<u32> = (0..logits.len() as u32)
        .filter(|&i| !logits[i as usize].is_nan())
        .collect();
    let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    if top_k > 0 && top_k < order.len() {
        order.select_nth_unstable_by(top_k - 1, by_logit);
        order.truncate(top_k);
    }
    order.sort_unstable_by(by_logit);
    let Some(&first) = order.first() else {
        return Vec::new();
    };
    let max = logits[first as usize] as f64 / t;
    let weights: Vec<f64> = order
        .iter()
        .map(|&i| (logits[i as usize] as f64 / t - max).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut out = Vec::with_capacity(order.len());
    let mut acc = 0.0;
    for (&id, w) in order.iter().zip(weights) {
        let p = w / total;
        out.push((id, p));
        acc += p;
        // HF keeps the token that crosses top_p (and always at least one).
        if acc >= top_p as f64 {
            break;
        }
    }
    let kept: f64 = out.iter().map(|&(_, p)| p).sum();
    for (_, p) in &mut out {
        *p /= kept;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_prefers_lowest_index_on_ties() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
    }

    /// The vectorised argmax against a plain scan, on lengths around its 16 lanes, with NaNs,
    /// infinities, ties in the tail and a maximum in every position.
    #[test]
    fn argmax_equals_a_scan_with_nans_and_ties() {
        let scan = |l: &[f32]| {
            let mut best: Option<usize> = None;
            for (i, &x) in l.iter().enumerate() {
                if !x.is_nan() && best.is_none_or(|b| x > l[b]) {
                    best = Some(i);
                }
            }
            best.unwrap_or(0) as u32
        };
        for len in [1, 15, 16, 17, 33, 100] {
            for at in 0..len {
                let mut l: Vec<f32> = (0..len).map(|i| ((i * 7) % 5) as f32).collect();
                l[at] = 9.0;
                if len > 2 {
                    l[(at + 1) % len] = f32::NAN;
                    l[len - 1 - at % 2] = 9.0;
                }
                assert_eq!(l.len(), len);
                assert_eq!(argmax(&l), scan(&l), "{l:?}");
            }
        }
        assert_eq!(argmax(&[f32::NAN, f32::NEG_INFINITY, f32::NEG_INFINITY]), 1);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative() {
        let mut l = vec![2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut l, &[0, 1, 1], 2.0);
        assert_eq!(l, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn top_k_and_top_p_keep_the_expected_sets() {
        // probabilities ~ [0.5, 0.25, 0.125, 0.125] at temperature 1
        let l: Vec<f32> = [0.5f32, 0.25, 0.125, 0.125].iter().map(|p| p.ln()).collect();
        let k2 = filtered_probs(&l, 1.0, 2, 1.0);
        assert_eq!(k2.iter().map(|x| x.0).collect::<Vec<_>>(), vec![0, 1]);
        assert!((k2[0].1 - 2.0 / 3.0).abs() < 1e-9);
        let p = filtered_probs(&l, 1.0, 0, 0.7);
        assert_eq!(p.iter().map(|x| x.0).collect::<Vec<_>>(), vec![0, 1]);
        let all = filtered_probs(&l, 1.0, 0, 1.0);
        assert_eq!(all.len(), 4);
        assert!((all[3].1 - 0.125).abs() < 1e-9);
    }

    #[test]
    fn low_temperature_concentrates_mass() {
        let l = vec![1.0f32, 0.9, 0.0];
        let p = filtered_probs(&l, 0.01, 0, 1.0);
        assert!(p[0].1 > 0.99);
    }

    #[test]
    fn seeded_sampler_is_reproducible() {
        let l: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let params = SamplingParams {
            temperature: 1.0,
            seed: 7,
            ..SamplingParams::greedy()
        };
        let draw = |params: SamplingParams| {
            let mut s = Sampler::new(params);
            (0..64).map(|_| s.sample(&l, &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(params.clone()), draw(params.clone()));
        assert_ne!(draw(params.clone()), draw(SamplingParams { seed: 8, ..params }));
    }

    /// Speculative sampling: a draft drawn from q, accepted or replaced by `verify`, is distributed as the
    /// target p (Leviathan et al. 2023, Theorem 1), whatever q is, including a q that puts mass where p
    /// has none. Checked on 400k trials: every token's frequency within 4.5 standard errors of p.
    #[test]
    fn verified_drafts_are_distributed_as_the_target() {
        let target = vec![(3u32, 0.5), (1, 0.25), (4, 0.15), (0, 0.10)];
        let draft = vec![(1u32, 0.4), (3, 0.2), (2, 0.3), (0, 0.1)];
        let mut drafter = Sampler::new(SamplingParams {
            temperature: 1.0,
            seed: 11,
            ..SamplingParams::greedy()
        });
        let mut verifier = Sampler::new(SamplingParams {
            seed: 12,
            ..drafter.params.clone()
        });
        let trials = 400_000;
        let mut counts = [0usize; 5];
        let mut accepted = 0;
        for _ in 0..trials {
            let token = drafter.draw(&draft);
            let out = match verifier.verify(token, &draft, &target) {
                Ok(t) => {
                    accepted += 1;
                    t
                }
                Err(t) => t,
            };
            counts[out as usize] += 1;
        }
        for (id, p) in [(0usize, 0.10), (1, 0.25), (2, 0.0), (3, 0.5), (4, 0.15)] {
            let freq = counts[id] as f64 / trials as f64;
            let sigma = (p * (1.0 - p) / trials as f64).sqrt();
            assert!(
                (freq - p).abs() <= 4.5 * sigma.max(1e-9),
                "token {id}: {freq} vs {p}"
            );
        }
        // Acceptance = sum_x min(p, q) = 0.25 + 0.2 + 0 + 0.1 = 0.55.
        let rate = accepted as f64 / trials as f64;
        assert!(
            (rate - 0.55).abs() < 4.5 * (0.55f64 * 0.45 / trials as f64).sqrt(),
            "acceptance {rate}"
        );
    }
}
