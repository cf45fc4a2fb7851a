"""Training stm-lite: clips from still images, procedural videos and DAVIS-layout videos."""
