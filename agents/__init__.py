"""Agents and their tools."""
