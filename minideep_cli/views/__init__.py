"""Rendering only: training and tokenizing progress, routing reports in the terminal (rich), the
live sampling panel, the self-contained HTML report and bench tables. Everything here turns plain
data from the engines into output."""
