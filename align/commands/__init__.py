"""The commands of ``align``: cli (the entry point), sample, search, label, sweep (and its report), eval."""
