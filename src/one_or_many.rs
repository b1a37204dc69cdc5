//! A list that is nearly always one item long, kept without a heap list until it has two.
//!
//! At 5 000 peers an index holds 5 000 entries of one item each (a peer's DNS record, a
//! policy's rule for a peer's address): a `Vec` for each was 5 000 allocations per rebuild.

/// One item inline, or several in a `Vec`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    /// Add an item; the second one moves both into a `Vec`.
    pub fn push(&mut self, item: T) {
        // An empty Vec does not allocate: a placeholder while the first item moves.
        *self = match std::mem::replace(self, OneOrMany::Many(Vec::new())) {
            OneOrMany::One(first) => OneOrMany::Many(vec![first, item]),
            OneOrMany::Many(mut v) => {
                v.push(item);
                OneOrMany::Many(v)
            }
        };
    }

    pub fn as_slice(&self) -> &[T] {
        match self {
            OneOrMany::One(item) => std::slice::from_ref(item),
            OneOrMany::Many(v) => v,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_stays_inline_and_more_keep_their_order() {
        let mut l = OneOrMany::One("a".to_string());
        assert_eq!(l.as_slice(), ["a"]);
        l.push("b".into());
        l.push("c".into());
        assert_eq!(l.as_slice(), ["a", "b", "c"]);
        assert!(matches!(l, OneOrMany::Many(_)));
    }
}
