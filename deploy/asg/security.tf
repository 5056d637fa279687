# Security groups. With client IP preservation the instances see the legacy VMs' own addresses,
# so the instances' group admits client_cidrs on the service ports; health checks come from the
# NLB's addresses inside the VPC.

resource "aws_security_group" "nlb" {
  name_prefix = "${var.name}-nlb-"
  description = "fwdproxy ${var.name} NLB: service ports from the legacy VMs"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = "${var.name}-nlb" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "nlb_clients" {
  for_each = local.ingress

  security_group_id = aws_security_group.nlb.id
  description       = "port ${each.value.port} from ${each.value.from}"
  ip_protocol       = "tcp"
  from_port         = tonumber(each.value.port)
  to_port           = tonumber(each.value.port)
  cidr_ipv4         = each.value.cidr
}

resource "aws_vpc_security_group_egress_rule" "nlb_to_instances" {
  security_group_id            = aws_security_group.nlb.id
  description                  = "to the appliances: service ports and health checks"
  ip_protocol                  = "tcp"
  from_port                    = 1
  to_port                      = 65535
  referenced_security_group_id = aws_security_group.instances.id
}

resource "aws_security_group" "instances" {
  name_prefix = "${var.name}-"
  description = "fwdproxy ${var.name} appliances"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = var.name })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "clients" {
  for_each = local.ingress

  security_group_id = aws_security_group.instances.id
  description       = "port ${each.value.port} from ${each.value.from} (client IP preserved)"
  ip_protocol       = "tcp"
  from_port         = tonumber(each.value.port)
  to_port           = tonumber(each.value.port)
  cidr_ipv4         = each.value.cidr
}

resource "aws_vpc_security_group_ingress_rule" "health_checks" {
  security_group_id = aws_security_group.instances.id
  description       = "NLB health checks of /ready"
  ip_protocol       = "tcp"
  from_port         = var.metrics_port
  to_port           = var.metrics_port
  cidr_ipv4         = data.aws_vpc.this.cidr_block
}

resource "aws_vpc_security_group_ingress_rule" "gossip" {
  for_each = toset(["tcp", "udp"])

  security_group_id            = aws_security_group.instances.id
  description                  = "gossip between the appliances (${each.key})"
  ip_protocol                  = each.key
  from_port                    = var.gossip_port
  to_port                      = var.gossip_port
  referenced_security_group_id = aws_security_group.instances.id
}

resource "aws_vpc_security_group_ingress_rule" "monitoring" {
  for_each = { for pair in setproduct([var.metrics_port, 15090, 9100], var.monitoring_cidrs) : "${pair[0]}-${pair[1]}" => { port = pair[0], cidr = pair[1] } }

  security_group_id = aws_security_group.instances.id
  description       = "Prometheus scrapes port ${each.value.port}"
  ip_protocol       = "tcp"
  from_port         = each.value.port
  to_port           = each.value.port
  cidr_ipv4         = each.value.cidr
}

resource "aws_vpc_security_group_egress_rule" "instances" {
  for_each = toset(var.egress_cidrs)

  security_group_id = aws_security_group.instances.id
  description       = "east-west gateways, AWS APIs, package mirrors"
  ip_protocol       = "-1"
  cidr_ipv4         = each.key
}
