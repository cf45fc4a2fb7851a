"""The STM core: networks, memory, propagation engine. Imports torch and numpy only."""
