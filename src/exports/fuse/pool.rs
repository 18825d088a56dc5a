//! Request-sized buffers kept for reuse: a 1 MiB write's request and a
//! large read's reply each need one, and a fresh zeroed megabyte per
//! request costs page faults and a memset every time.
use std::sync::Mutex;

pub struct Pool {
    free: Mutex<Vec<Vec<u8>>>,
    size: usize,
    keep: usize,
}

impl Pool {
    /// Buffers of `size` bytes; at most `keep` are held while unused.
    pub fn new(size: usize, keep: usize) -> Pool {
        Pool {
            free: Mutex::new(Vec::new()),
            size,
            keep,
        }
    }

    pub fn size(&self) -> usize {
        self.size
    }

    pub fn take(&self) -> Vec<u8> {
        let reused = self.free.lock().ok().and_then(|mut f| f.pop());
        reused.unwrap_or_else(|| vec![0u8; self.size])
    }

    /// Takes a buffer back; one of another size is dropped.
    pub fn give(&self, b: Vec<u8>) {
        if b.len() != self.size {
            return;
        }
        if let Ok(mut f) = self.free.lock() {
            if f.len() < self.keep {
                f.push(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Pool;

    #[test]
    fn buffers_come_back_up_to_the_limit() {
        let p = Pool::new(16, 1);
        let a = p.take();
        let mut b = p.take();
        b[0] = 7;
        p.give(a);
        p.give(b);
        p.give(vec![0u8; 3]);
        assert_eq!(p.free.lock().map(|f| f.len()).unwrap_or(0), 1);
        assert_eq!(p.take().len(), 16);
    }
}
