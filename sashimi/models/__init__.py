"""Model families: each module holds a family's config, presets and the model that adapts a backbone to audio."""
