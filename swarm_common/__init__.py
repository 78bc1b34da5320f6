"""What both services share: model providers, prompts, pricing, configuration, logging, serving."""
