"""diffusers pipelines for atdiff models (installed as ``atdiff.pipelines``)."""
