//! The Markdown tables the tool prints (one or more per scenario).

use std::fmt;

/// A titled Markdown table with notes under it (how each number was obtained).
#[derive(Debug, Clone, Default)]
pub struct Table {
    title: String,
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
    notes: Vec<String>,
}

impl Table {
    /// An empty table with a title and column headers.
    pub fn new(title: impl Into<String>, headers: &[&str]) -> Self {
        Self {
            title: title.into(),
            headers: headers.iter().map(|h| (*h).to_owned()).collect(),
            ..Self::default()
        }
    }

    /// Appends a row; missing cells are left empty, extra cells are kept.
    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) -> &mut Self {
        self.rows.push(cells.into_iter().map(Into::into).collect());
        self
    }

    /// Appends a note printed under the table.
    pub fn note(&mut self, note: impl Into<String>) -> &mut Self {
        self.notes.push(note.into());
        self
    }
}

/// `|` inside a cell would end it; newlines would end the row.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "### {}", self.title)?;
        writeln!(f)?;
        let width = self
            .rows
            .iter()
            .map(Vec::len)
            .chain([self.headers.len()])
            .max()
            .unwrap_or(0);
        let line = |f: &mut fmt::Formatter<'_>, cells: &[String]| -> fmt::Result {
            write!(f, "|")?;
            for i in 0..width {
                write!(f, " {} |", cell(cells.get(i).map_or("", String::as_str)))?;
            }
            writeln!(f)
        };
        line(f, &self.headers)?;
        writeln!(f, "|{}", "---|".repeat(width))?;
        for row in &self.rows {
            line(f, row)?;
        }
        if !self.notes.is_empty() {
            writeln!(f)?;
            for note in &self.notes {
                writeln!(f, "- {note}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_markdown_with_padding_escaping_and_notes() {
        let mut t = Table::new("storm", &["run", "calls"]);
        t.row(["cold", "10,000"]).row(["a|b"]).note("measured");
        assert_eq!(
            t.to_string(),
            "### storm\n\n| run | calls |\n|---|---|\n| cold | 10,000 |\n| a\\|b |  |\n\n- measured\n"
        );
    }
}
