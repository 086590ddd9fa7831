"""The NSA paper's reported numbers (nsa_paper.json), carried as package data for report reference rows."""
