"""sashimi: raw-audio generative models (SaShiMi and flows) built on s4lib."""
