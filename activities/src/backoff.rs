//! Doubling delays between tries, capped: the one backoff of evalflow's
//! retry loops.

use std::time::Duration;

/// The delays before the next tries: `first`, then twice the last, up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// Delays from `first`, doubling, never above `max`.
    pub const fn new(first: Duration, max: Duration) -> Backoff {
        Backoff { first, next: first, max }
    }

    /// The delay before the next try; the one after it doubles.
    pub fn delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    /// Back to the first delay, after a success.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_start_again_after_a_reset() {
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(1));
        let delays: Vec<u128> = (0..4).map(|_| backoff.delay().as_millis()).collect();
        assert_eq!(delays, [250, 500, 1000, 1000]);
        backoff.reset();
        assert_eq!(backoff.delay(), Duration::from_millis(250));
    }
}
