//! Comparing secrets (admin tokens, inference API keys) without leaking them through timing.

/// True when `given` equals `expected`. The time taken depends only on the lengths, never on
/// where the first difference is, so response timing does not reveal how much of a token
/// matched. Lengths are not secret (a bearer token's length is visible on the wire anyway).
pub fn constant_time_eq(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = given.len() ^ expected.len();
    for i in 0..given.len().max(expected.len()) {
        // Unequal lengths already set `diff`; past the shorter input the loop only keeps time.
        let x = given.get(i).copied().unwrap_or(0);
        let y = expected.get(i).copied().unwrap_or(0);
        // black_box keeps the optimiser from turning the loop into an early-exit comparison.
        diff |= std::hint::black_box(usize::from(x ^ y));
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn equal_only_when_identical() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(constant_time_eq(b"", b""));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"Secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"secret2", b"secret"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(!constant_time_eq(b"x", b""));
        // A shorter input padded with the filler byte still differs.
        assert!(!constant_time_eq(b"ab", b"ab\x00"));
        assert!(!constant_time_eq(b"ab\x00", b"ab"));
    }
}
