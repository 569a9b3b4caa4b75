"""Word statistics of text files (an AppPot recipe example)."""
