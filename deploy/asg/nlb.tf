# The internal NLB the legacy VMs reach through the DNS rewrite: one TCP listener and target group
# per catalog port, and with reverse_port one more for the reverse direction's inbound mTLS
# listener (mesh workloads calling VM services). Client addresses are preserved, because the
# appliance enforces each service's allowedClients CIDRs on the caller's address.

locals {
  service_ports = { for p in var.listener_ports : tostring(p.port) => p }
  reverse_list  = var.reverse_port == null ? [] : [var.reverse_port]
  reverse_ports = { for p in local.reverse_list : tostring(p) => { port = p, protocol = "mtls" } }
  ports         = merge(local.service_ports, local.reverse_ports)
  # Who may reach each port: the legacy VMs the service ports, the mesh the reverse port.
  ingress = merge(
    { for pair in setproduct(keys(local.service_ports), var.client_cidrs) : "${pair[0]}-${pair[1]}" => { port = pair[0], cidr = pair[1], from = "legacy VMs" } },
    { for pair in setproduct(keys(local.reverse_ports), var.mesh_cidrs) : "${pair[0]}-${pair[1]}" => { port = pair[0], cidr = pair[1], from = "mesh workloads (reverse direction, mTLS)" } },
  )
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

  lifecycle {
    precondition {
      condition     = var.reverse_port == null || length(var.mesh_cidrs) > 0
      error_message = "reverse_port is set but mesh_cidrs is empty: give the CIDRs of the mesh workloads (pods or nodes) that call VM services through the fleet."
    }
    precondition {
      condition     = var.reverse_port == null || !contains([for p in var.listener_ports : p.port], var.reverse_port)
      error_message = "reverse_port is also in listener_ports: the reverse direction's inbound port is reserved (fwdproxy's reverse.port); choose another."
    }
  }

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.port[each.key].arn
  }

  tags = local.tags
}
