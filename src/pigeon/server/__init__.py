"""pigeon serve: brokers that speak other systems' wire protocols on top of pigeon."""
