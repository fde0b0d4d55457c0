"""Rendering only: routing reports in the terminal (rich), the live sampling panel and the
self-contained HTML report. Everything here turns plain data from the engine into output."""
