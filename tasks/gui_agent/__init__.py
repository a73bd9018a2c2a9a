"""GUI agent plugins: HiconAgent (HCPO) on GUI episode datasets and ScreenExplorer on a live browser."""
