"""FairFaceGPT generation: FairFace (or synthetic) faces -> attribute QA -> TFDS ArrayRecord."""
