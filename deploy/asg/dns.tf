# The DNS rewrite: private hosted zones for the mesh names the legacy VMs use, associated with
# their VPCs, answering every name (wildcard) or the listed names with the NLB. The VMs keep
# calling reviews.bookinfo.svc.cluster.local:9080; their VPC resolver now answers with the NLB.
# Why a private zone rather than a Resolver forwarding rule: see README.md.

locals {
  dns_records = merge([
    for zone, z in var.dns_zones : {
      for name in coalescelist(z.names, ["*"]) : "${name}.${zone}" => { zone = zone, name = name }
    }
  ]...)
}

resource "aws_route53_zone" "mesh" {
  for_each = var.dns_zones

  name    = each.key
  comment = "fwdproxy ${var.name}: mesh names answered with the appliance NLB"

  dynamic "vpc" {
    for_each = var.dns_vpc_ids
    content {
      vpc_id = vpc.value
    }
  }

  tags = local.tags

  lifecycle {
    precondition {
      condition     = length(var.dns_vpc_ids) > 0
      error_message = "Private hosted zones need at least one VPC: set dns_vpc_ids to the legacy VMs' VPCs."
    }
  }
}

resource "aws_route53_record" "mesh" {
  for_each = local.dns_records

  zone_id = aws_route53_zone.mesh[each.value.zone].zone_id
  name    = each.key
  type    = "A"

  alias {
    name                   = aws_lb.this.dns_name
    zone_id                = aws_lb.this.zone_id
    evaluate_target_health = true
  }
}
