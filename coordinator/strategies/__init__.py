"""How a federation turns updates into its next global model: base (the Strategy seam
and Composite), aggregate, server_opt, staleness, and registry (the strategies a run
names). Nothing is imported here, so `jetfed --help` finds `jetfed strategies` without
loading torch."""
