"""loopline's Redis transport for kombu: an atomic fetch a killed worker cannot lose, bad entries dead-lettered."""
