"""Publishing a run: the model card (template, rendering, the mSAM and curvature sections) and the Hub push."""
