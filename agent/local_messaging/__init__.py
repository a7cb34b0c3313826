"""Local messaging: gateway apps publish and subscribe through the agent, with a durable spool."""
