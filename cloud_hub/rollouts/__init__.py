"""Progressive rollouts: a deployment change reaching its devices wave by wave, gated by what
the new version does (docs/rollouts.md)."""
