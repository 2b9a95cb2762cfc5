"""Quality scores of (instruction, answer) rows: the three scorers behind ``ScorerConfig``
(``scorers.build_scorer``), and IFD (necessity without generation)."""
