"""Audio data: file I/O, quantisation, and the folder and built-in datasets shared by every family."""
