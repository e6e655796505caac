"""Package data: the general-text set of the forgetting check (general_text.txt)."""
