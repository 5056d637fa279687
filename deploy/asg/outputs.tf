output "nlb_dns_name" {
  description = "DNS name of the internal NLB (what the mesh names resolve to)."
  value       = aws_lb.this.dns_name
}

output "nlb_arn" {
  description = "ARN of the internal NLB."
  value       = aws_lb.this.arn
}

output "nlb_zone_id" {
  description = "Route 53 zone ID of the NLB, for further alias records (e.g. legacy alias names in zones managed elsewhere)."
  value       = aws_lb.this.zone_id
}

output "target_group_arns" {
  description = "Target group ARN per service port."
  value       = { for port, tg in aws_lb_target_group.port : port => tg.arn }
}

output "autoscaling_group_name" {
  description = "Name of the Auto Scaling group (also what the instances use for peer discovery)."
  value       = aws_autoscaling_group.this.name
}

output "autoscaling_group_arn" {
  description = "ARN of the Auto Scaling group."
  value       = aws_autoscaling_group.this.arn
}

output "launch_template_id" {
  description = "ID of the launch template."
  value       = aws_launch_template.this.id
}

output "lifecycle_hook_name" {
  description = "Name of the termination lifecycle hook the instances complete."
  value       = local.lifecycle_hook_name
}

output "instance_security_group_id" {
  description = "Security group of the appliances (allow it on the east-west gateways' port 15443 if they filter by source)."
  value       = aws_security_group.instances.id
}

output "nlb_security_group_id" {
  description = "Security group of the NLB."
  value       = aws_security_group.nlb.id
}

output "iam_role_arn" {
  description = "ARN of the instances' IAM role (e.g. for a CA's resource policy or VPC endpoint policies)."
  value       = aws_iam_role.this.arn
}

output "hosted_zone_ids" {
  description = "Private hosted zone ID per zone name."
  value       = { for zone, z in aws_route53_zone.mesh : zone => z.zone_id }
}

output "dns_records" {
  description = "Names answered with the NLB (\"*.ZONE\" for a wildcard)."
  value       = sort(keys(local.dns_records))
}

output "user_data" {
  description = "The rendered cloud-init user data (no secrets; useful to review the daemon's configuration)."
  value       = local.user_data
}
