# The internal NLB the legacy VMs reach through the DNS rewrite: one TCP listener and target group
# per catalog port. Client addresses are preserved, because the appliance enforces each service's
# allowedClients CIDRs on the caller's address.

locals {
  ports = { for p in var.listener_ports : tostring(p.port) => p }
}

resource "aws_lb" "this" {
  name                             = var.name
  internal                         = true
  load_balancer_type               = "network"
  subnets                          = var.subnet_ids
  security_groups                  = [aws_security_group.nlb.id]
  enable_cross_zone_load_balancing = var.cross_zone_load_balancing
  enable_deletion_protection       = var.enable_deletion_protection
  ip_address_type                  = "ipv4"
  tags                             = local.tags
}

resource "aws_lb_target_group" "port" {
  for_each = local.ports

  name                 = "${var.name}-${each.key}"
  port                 = each.value.port
  protocol             = "TCP"
  target_type          = "instance"
  vpc_id               = var.vpc_id
  preserve_client_ip   = true
  deregistration_delay = var.deregistration_delay
  # Long-lived TCP connections (databases) are closed when the drain ends, not left hanging.
  connection_termination = true

  # Every port's target group checks the same thing: the daemon's readiness (an identity, a
  # catalog, and a snapshot the data plane acknowledged), not merely an open port.
  health_check {
    enabled             = true
    protocol            = "HTTP"
    port                = tostring(var.metrics_port)
    path                = "/ready"
    matcher             = "200"
    interval            = var.health_check.interval_seconds
    timeout             = var.health_check.timeout_seconds
    healthy_threshold   = var.health_check.healthy_threshold
    unhealthy_threshold = var.health_check.unhealthy_threshold
  }

  tags = merge(local.tags, { "fwdproxy:port" = each.key, "fwdproxy:protocol" = each.value.protocol })
}

resource "aws_lb_listener" "port" {
  for_each = local.ports

  load_balancer_arn = aws_lb.this.arn
  port              = each.value.port
  protocol          = "TCP"

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.port[each.key].arn
  }

  tags = local.tags
}
