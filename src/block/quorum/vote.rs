//! The quorum's votes, as QEMU counts them (pure: unit-tested).
//!
//! Each distinct content (or errno) is a version. QEMU keeps versions in
//! a list where a new one goes first and each version's voters too, so
//! "list order" is the reverse of first appearance. The winner is the
//! first version in list order with the most votes; versions that lost
//! are reported in list order, their voters newest first. Reports and
//! QMP events follow that order, so clients see QSD's sequence.

/// A version: its voters (child indexes) in order of appearance.
#[derive(Debug, PartialEq, Eq)]
struct Version {
    voters: Vec<usize>,
}

/// Groups `items` (child index, value) by equal value; versions come
/// back in QEMU's list order.
fn versions<T>(items: &[(usize, T)], same: impl Fn(&T, &T) -> bool) -> Vec<Version> {
    let mut found: Vec<(usize, Version)> = Vec::new();
    for (i, (idx, v)) in items.iter().enumerate() {
        match found
            .iter_mut()
            .find(|(first, _)| same(&items[*first].1, v))
        {
            Some((_, ver)) => ver.voters.push(*idx),
            None => found.push((i, Version { voters: vec![*idx] })),
        }
    }
    found.into_iter().rev().map(|(_, v)| v).collect()
}

/// The first version with the most votes, in list order.
fn winner(list: &[Version]) -> Option<usize> {
    let mut best: Option<(usize, usize)> = None;
    for (i, v) in list.iter().enumerate() {
        if best.is_none_or(|(_, n)| v.voters.len() > n) {
            best = Some((i, v.voters.len()));
        }
    }
    best.map(|(i, _)| i)
}

/// What the reads of the children decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The data of child `from` wins; `bad` are the children whose data
    /// differs, in the order QEMU reports them.
    Winner { from: usize, bad: Vec<usize> },
    /// No version has `threshold` votes.
    NoQuorum,
}

/// Votes on the successful reads (child index, data); there is at least
/// one. QEMU first checks whether all agree with the first (no report
/// then), and only otherwise counts versions.
pub fn vote(reads: &[(usize, &[u8])], threshold: usize) -> Verdict {
    let Some((first, data)) = reads.first() else {
        return Verdict::NoQuorum;
    };
    if reads.iter().all(|(_, d)| d == data) {
        return Verdict::Winner {
            from: *first,
            bad: Vec::new(),
        };
    }
    let list = versions(reads, |a, b| a == b);
    let Some(w) = winner(&list) else {
        return Verdict::NoQuorum;
    };
    if list[w].voters.len() < threshold {
        return Verdict::NoQuorum;
    }
    let bad = list
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != w)
        .flat_map(|(_, v)| v.voters.iter().rev().copied())
        .collect();
    Verdict::Winner {
        from: list[w].voters[0],
        bad,
    }
}

/// The errno that the most children failed with (QEMU's
/// quorum_vote_error); None when none failed.
pub fn vote_error(errors: &[(usize, i32)]) -> Option<i32> {
    let list = versions(errors, |a, b| a == b);
    let w = winner(&list)?;
    let first = list[w].voters[0];
    errors.iter().find(|(i, _)| *i == first).map(|(_, e)| *e)
}

/// The offset of the first byte where `a` and `b` differ (blkverify).
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agreeing_reads_win_without_reports() {
        let (a, b) = (vec![1u8; 8], vec![1u8; 8]);
        assert_eq!(
            vote(&[(0, &a), (2, &b)], 2),
            Verdict::Winner {
                from: 0,
                bad: vec![]
            }
        );
    }

    #[test]
    fn the_majority_wins_and_losers_are_reported_newest_first() {
        let good = vec![5u8; 4];
        let x = vec![1u8; 4];
        let y = vec![2u8; 4];
        // Children 1 and 3 hold x, 2 holds y: QEMU's list is y, x, good.
        let reads: Vec<(usize, &[u8])> = vec![
            (0, &good),
            (1, &x),
            (2, &y),
            (3, &x),
            (4, &good),
            (5, &good),
        ];
        assert_eq!(
            vote(&reads, 2),
            Verdict::Winner {
                from: 0,
                bad: vec![2, 3, 1]
            }
        );
    }

    #[test]
    fn a_winner_below_the_threshold_is_no_quorum() {
        let (a, b, c) = (vec![0u8; 2], vec![1u8; 2], vec![2u8; 2]);
        assert_eq!(vote(&[(0, &a), (1, &b), (2, &c)], 2), Verdict::NoQuorum);
        assert_eq!(vote(&[(0, &a), (1, &a), (2, &c)], 3), Verdict::NoQuorum);
    }

    #[test]
    fn ties_go_to_the_version_seen_last() {
        let (a, b) = (vec![0u8; 2], vec![1u8; 2]);
        assert_eq!(
            vote(&[(0, &a), (1, &b)], 1),
            Verdict::Winner {
                from: 1,
                bad: vec![0]
            }
        );
    }

    #[test]
    fn the_most_common_error_wins() {
        assert_eq!(vote_error(&[]), None);
        assert_eq!(vote_error(&[(0, 5), (1, 28), (2, 28)]), Some(28));
        // A tie: the errno seen last, as in QEMU's list.
        assert_eq!(vote_error(&[(0, 5), (2, 28)]), Some(28));
    }

    #[test]
    fn first_difference_finds_the_byte() {
        assert_eq!(first_difference(&[1, 2, 3], &[1, 2, 3]), None);
        assert_eq!(first_difference(&[1, 2, 3], &[1, 9, 3]), Some(1));
    }
}
