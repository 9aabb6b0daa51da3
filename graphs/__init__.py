"""The reviewed record of what the compiler makes of our step; see graphs/README.md."""
