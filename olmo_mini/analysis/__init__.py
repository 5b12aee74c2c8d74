"""What reads finished runs or drives training, above ``training``: run readers (``runs``),
comparisons (``compare``), LR sensitivity (``sensitivity``, ``sweep``) and the study runner
(``study``). Import from the submodules; the package exports nothing, so importing it loads
nothing."""
