//! Stop strings in streamed text: what is safe to show, and where the text ends.

/// Finds stop strings in streamed text, holding back what could still become one.
#[derive(Debug)]
pub struct StopMatcher<'a> {
    stops: &'a [String],
    text: String,
    /// Bytes of `text` already handed out.
    emitted: usize,
    stopped: bool,
}

impl<'a> StopMatcher<'a> {
    /// A matcher of `stops` (empty strings never match).
    pub fn new(stops: &'a [String]) -> Self {
        StopMatcher { stops, text: String::new(), emitted: 0, stopped: false }
    }

    /// Appends `piece`; returns the text now safe to show and whether a stop string was found.
    pub fn push(&mut self, piece: &str) -> (&str, bool) {
        if self.stopped {
            return ("", true);
        }
        self.text.push_str(piece);
        let from = self.emitted;
        let found =
            self.stops.iter().filter(|s| !s.is_empty()).filter_map(|s| self.text[from..].find(s.as_str())).min();
        let end = match found {
            Some(at) => {
                self.stopped = true;
                self.text.truncate(from + at);
                self.text.len()
            }
            None => self.text.len() - self.held_back(),
        };
        self.emitted = end;
        (&self.text[from..end], self.stopped)
    }

    /// Bytes at the end of the text that are a proper prefix of some stop string.
    fn held_back(&self) -> usize {
        let tail = &self.text[self.emitted..];
        self.stops
            .iter()
            .flat_map(|s| {
                (1..s.len().min(tail.len() + 1)).rev().find(|&n| s.is_char_boundary(n) && tail.ends_with(&s[..n]))
            })
            .max()
            .unwrap_or(0)
    }

    /// Hands out whatever was held back.
    pub fn flush(&mut self) -> &str {
        let from = self.emitted;
        self.emitted = self.text.len();
        &self.text[from..]
    }

    /// Whether a stop string was found.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// All text so far, cut before the stop string.
    pub fn into_text(self) -> String {
        self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(stops: &[&str], pieces: &[&str]) -> (String, String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut shown = String::new();
        for p in pieces {
            let (ready, stopped) = m.push(p);
            shown.push_str(ready);
            if stopped {
                break;
            }
        }
        if !m.stopped() {
            shown.push_str(m.flush());
        }
        let stopped = m.stopped();
        (shown, m.into_text(), stopped)
    }

    #[test]
    fn stop_string_split_across_pieces_is_cut_and_never_shown() {
        let (shown, text, stopped) = stream(&["END"], &["Hello E", "N", "D and more"]);
        assert_eq!((shown.as_str(), text.as_str(), stopped), ("Hello ", "Hello ", true));
    }

    #[test]
    fn held_back_prefix_is_released_when_it_does_not_complete() {
        let (shown, text, stopped) = stream(&["END"], &["a E", "x", "EN"]);
        assert_eq!((shown.as_str(), text.as_str(), stopped), ("a ExEN", "a ExEN", false));
    }

    #[test]
    fn earliest_stop_string_wins() {
        let (shown, _, stopped) = stream(&["cd", "b"], &["abcd"]);
        assert_eq!((shown.as_str(), stopped), ("a", true));
    }
}
